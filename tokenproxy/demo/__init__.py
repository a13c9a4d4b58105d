"""``tokenproxy demo``: a built-in token issuer and protected API (issuer.py), and the daemon
in front of them (run.py)."""
