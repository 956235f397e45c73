"""The status dashboard: one static page and its assets (api/dashboard/), shipped in the
package and served by the API itself, so it works offline and behind the same TLS and
host as the API it calls. No key is needed for the page; every call it makes needs one."""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles

ASSETS = Path(__file__).resolve().parents[1] / "dashboard"
# Scripts only from this origin (no inline script, no CDN), calls only to this API, and
# no framing (clickjacking). Inline style attributes are allowed: the charts set them.
HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; "
    "style-src 'self' 'unsafe-inline'; img-src 'self' data: blob:; connect-src 'self'; "
    "frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


def install(app: FastAPI) -> None:
    app.mount("/dashboard/static", StaticFiles(directory=ASSETS), name="dashboard-assets")

    @app.get("/dashboard", include_in_schema=False)
    def dashboard() -> FileResponse:
        return FileResponse(ASSETS / "index.html", headers=HEADERS)

    @app.get("/favicon.ico", include_in_schema=False)
    def favicon() -> FileResponse:
        # what browsers ask for on pages without an icon link (/docs): the dashboard's icon
        return FileResponse(ASSETS / "favicon.svg", media_type="image/svg+xml")

    @app.get("/", include_in_schema=False)
    def home() -> RedirectResponse:
        return RedirectResponse("/dashboard")
