"""tokenproxy's own HTTP/1.1 protocol for the common request (see connection.py)."""
