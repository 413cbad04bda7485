"""The interactive inpainting page (app.py serves it): index.html, its HTTP server (server.py) and the inpainting
it streams step by step (inference.py). It sits on the decoding (sampler/) as the trainers (training/) do, and
neither imports the other."""
