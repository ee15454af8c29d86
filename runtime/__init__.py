"""kiln runtime: pull and verify an artifact, check it fits this host, and serve it over HTTP.

Imports only ``artifacts`` from kiln (never ``build``, ``quantize`` or ``compile``), and engine libraries only
when an engine starts.
"""
