"""The forward-proxy listener (HTTPS_PROXY): a second listener, apart from the main one, for
tools that cannot change their base URL. ``CONNECT`` to a configured host is answered with TLS
terminated by a certificate from the local CA (ca.py), whose name constraints let it sign for
those hosts only, and the requests inside get the provider's token as on a route."""
