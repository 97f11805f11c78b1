"""The control API: HTTP/JSON with an OpenAPI document, over the same controller."""
