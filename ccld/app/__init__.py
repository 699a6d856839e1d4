"""The web page of app.py: its flags (flags.py), the models it loads once and the jobs it
runs on them (engine.py), the page itself (page.py) and how it is served (serve.py)."""
