"""``bcsfl audit report``: one self-contained HTML page of a run, verified round by round.

The page is rendered by Jinja2 with autoescaping on, so everything taken from the run
directory (client ids, reasons, hashes) is shown as text: a reason string that holds
HTML or a script is escaped, and the plots' data travel as JSON inside a non-executable
``<script type="application/json">``, which Jinja's ``tojson`` makes HTML-safe. As a
second wall, the page's Content-Security-Policy lets only its own two scripts run (by
their SHA-256 hashes): the Vega bundle and the few lines that draw the plots. Vega
compiles its expressions with ``Function``, hence ``'unsafe-eval'``, which allows
nothing to an injected script that the hashes do not already allow to run.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import jinja2

from bcsfl_flower.audit.explorer.bundle import BUNDLE_PATH
from bcsfl_flower.audit.explorer.plots import plots
from bcsfl_flower.audit.explorer.view import STANDINGS, RunView, run_view
from bcsfl_flower.audit.verification import verify_trail
from bcsfl_flower.chain.audit import AuditTrail, ChainManifest
from bcsfl_flower.chain.backends import BACKEND_EMBEDDED

REPORT_FILE = "report.html"
"""The page's name in the run directory (``bcsfl audit report``'s default output)."""

TEMPLATE = "page.html.j2"

BOOTSTRAP = """(async () => {
  const specs = JSON.parse(document.getElementById("plot-specs").textContent);
  const options = {actions: false, renderer: "svg"};
  await Promise.all(Object.entries(specs).map(([id, spec]) =>
    vegaEmbed(document.getElementById(id), spec, options)));
  document.body.dataset.plots = "ready";
})().catch((error) => { document.body.dataset.plots = "failed: " + error; });"""
"""Draws every plot, then marks the body ``data-plots="ready"`` (what a test waits for)."""


@dataclass(frozen=True)
class WrittenReport:
    """Where the page went, how large it is, and whether the run verified."""

    path: Path
    size: int
    verified: bool

    @property
    def verdict(self) -> str:
        """How the command line and the launcher say whether the trail verified."""
        return "verified" if self.verified else "does NOT verify"


def render_page(run: RunView, *, links: str = "") -> str:
    """Return the page of ``run``; ``links`` prefixes the model files' paths in links."""
    bundle, policy = _scripts()
    counts = {
        r.number: {s: sum(c.standing == s for c in r.clients) for s in STANDINGS}
        for r in run.rounds
    }
    return _template().render(
        run=run,
        counts=counts,
        links=links,
        specs=plots(run),
        bundle=bundle,
        bootstrap=BOOTSTRAP,
        policy=policy,
    )


@functools.cache
def _scripts() -> tuple[str, str]:
    """Return the Vega bundle and the policy that runs it and the bootstrap (read once)."""
    bundle = BUNDLE_PATH.read_text(encoding="utf-8")
    return bundle, content_policy(bundle, BOOTSTRAP)


def content_policy(*scripts: str) -> str:
    """Return a policy that runs exactly ``scripts`` inline, and loads nothing from outside."""
    hashes = " ".join(f"'sha256-{_digest(script)}'" for script in scripts)
    return (
        f"default-src 'none'; script-src {hashes} 'unsafe-eval'; "
        "style-src 'unsafe-inline'; img-src data:"
    )


def _digest(script: str) -> str:
    return base64.b64encode(hashlib.sha256(script.encode("utf-8")).digest()).decode("ascii")


def _template() -> jinja2.Template:
    environment = jinja2.Environment(
        loader=jinja2.FileSystemLoader(Path(__file__).parent),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
    )
    return environment.get_template(TEMPLATE)


def write_report(
    manifest_path: Path, out: Path | None = None, *, chain: str | None = BACKEND_EMBEDDED
) -> WrittenReport:
    """Verify the run of ``manifest_path`` and write its page.

    Parameters
    ----------
    manifest_path : Path
        The run's ``chain.json``.
    out : Path | None
        Where to write the page (default: ``report.html`` beside ``chain.json``). An
        existing symbolic link there is refused, not followed.
    chain : str | None
        The backend to read the chain with, as ``bcsfl audit --chain`` takes it; None
        trusts the manifest (the launcher reporting on the run it just made).
    """
    manifest = ChainManifest.load(manifest_path)
    connection, trail = manifest.open(chain)
    try:
        return write_page(trail, manifest, out)
    finally:
        connection.close()


def write_page(
    trail: AuditTrail, manifest: ChainManifest, out: Path | None = None
) -> WrittenReport:
    """Verify an opened trail and write its page (``out`` as :func:`save_page` takes it)."""
    return save_page(
        run_view(trail, manifest, verify_trail(trail, manifest)), manifest.path.parent, out
    )


def save_page(run: RunView, run_dir: Path, out: Path | None = None) -> WrittenReport:
    """Write the page of ``run`` (whose directory is ``run_dir``) to ``out``."""
    target = out if out is not None else run_dir / REPORT_FILE
    if target.is_symlink():
        raise ValueError(f"{target} is a symbolic link: refusing to write through it")
    links = os.path.relpath(run_dir.resolve(), target.resolve().parent)
    page = render_page(run, links="" if links == "." else links + "/")
    target.write_text(page, encoding="utf-8")
    return WrittenReport(target, len(page.encode("utf-8")), run.verified)
