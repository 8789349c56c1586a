"""Regenerate the explorer page's plotting script from ``vl-convert-python``.

The page embeds Vega, Vega-Lite and Vega-Embed inline, so that it opens from disk with
no network. The script is the bundle that ``vl-convert`` (the Vega project's own
converter, which Altair uses for offline HTML) builds; it is committed as
``vega-bundle.js`` so that writing a report needs neither ``vl-convert`` (a 33 MB wheel)
nor its 4 s bundling step. ``tests/test_explorer.py`` rebuilds it with the pinned
``vl-convert-python`` of the ``dev`` extra and fails on any difference::

    python -m bcsfl_flower.audit.explorer.bundle
"""

from __future__ import annotations

from pathlib import Path

BUNDLE_PATH = Path(__file__).with_name("vega-bundle.js")
"""The committed bundle (Vega, Vega-Lite and Vega-Embed; BSD-3-Clause, see VEGA-LICENSE)."""


def build_bundle() -> str:
    """Return the bundle ``vl-convert`` builds: one classic script defining ``vegaEmbed``."""
    import vl_convert

    # the stub requires a snippet; without one the runtime bundles Vega-Embed whole
    return str(vl_convert.javascript_bundle())  # type: ignore[call-arg]


def bundle_versions() -> str:
    """Return the Vega and Vega-Embed versions of the installed ``vl-convert``."""
    import vl_convert

    return f"vega {vl_convert.get_vega_version()}, vega-embed {vl_convert.get_vega_embed_version()}"


if __name__ == "__main__":
    BUNDLE_PATH.write_text(build_bundle(), encoding="utf-8")
    print(f"wrote {BUNDLE_PATH} ({bundle_versions()})")
