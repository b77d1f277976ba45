"""The service's ``/docs`` page: the endpoints of an OpenAPI schema as self-contained HTML."""

from __future__ import annotations

from html import escape


def api_docs_html(schema: dict) -> str:
    """A self-contained HTML page (no scripts, no CDN) listing the API's endpoints from its
    OpenAPI ``schema``: method, path, summary and description, with a link to the full schema
    at ``/openapi.json`` for tools (Swagger UI, Postman, code generators)."""
    rows = []
    for path, ops in schema.get("paths", {}).items():
        for method, op in ops.items():
            text = op.get("description") or ""
            rows.append(
                f"<h2><code>{escape(method.upper())} {escape(path)}</code></h2>"
                f"<p><b>{escape(op.get('summary', ''))}</b></p><pre>{escape(text)}</pre>"
            )
    info = schema.get("info", {})
    return (
        "<!doctype html><html><head><meta charset='utf-8'>"
        f"<title>{escape(info.get('title', 'API'))} API</title>"
        "<style>body{font-family:sans-serif;max-width:60em;margin:2em auto}"
        "pre{white-space:pre-wrap}</style></head><body>"
        f"<h1>{escape(info.get('title', ''))} API {escape(str(info.get('version', '')))}</h1>"
        f"<p>{escape(info.get('description', ''))}</p>"
        "<p>The full machine-readable schema: <a href='/openapi.json'>/openapi.json</a> "
        "(load it into Swagger UI, Postman or a client generator). The web page: "
        "<a href='/'>/</a>.</p>" + "".join(rows) + "</body></html>"
    )
