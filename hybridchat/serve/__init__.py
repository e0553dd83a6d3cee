"""The model over HTTP: an OpenAI-compatible chat API, a knowledge-base search and a web page.

    python -m hybridchat.serve                       # hybrid_tiny's checkpoint as chat picks it, on 127.0.0.1:8000
    python -m hybridchat.serve port=0 api_key=secret # any free port (printed); Bearer key required

config.py     the schema (conf/serve.yaml states only differences)
batcher.py    one worker thread owns the model: replies decode together in a continuous batch, a bounded queue
protocol.py   requests read and checked, responses in the OpenAI chat-completions shape
app.py        the FastAPI routes, auth, errors as JSON
__main__.py   the Hydra entry point: open the checkpoint, bind, serve
static/       the page (plain HTML and JavaScript, no build step)

Docs: docs/serve.md.
"""
