"""Serialise a DomainSpec to libvirt domain XML (jinja2; autoescape on, StrictUndefined).

The template decides nothing; a value that is missing from the spec is an error, and every
string a person typed (names, paths) is escaped, so it cannot change the document's structure.
"""

from __future__ import annotations

from functools import cache

import jinja2

from ..ranges import format_index_list
from .spec import DomainSpec


@cache
def _env() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("slurm_dgxvm.design", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        # a template is read once per process: an upgrade's new one is not mixed into a
        # command that began with the old (slurm_dgxvm/preload.py)
        auto_reload=False,
    )
    env.filters["cpuset"] = lambda values: format_index_list(values)
    return env


def load_templates() -> None:
    """Read every template now (jinja2 keeps them for the process's life)."""
    env = _env()
    for name in env.list_templates():
        env.get_template(name)


def domain_xml(spec: DomainSpec) -> str:
    return _env().get_template("domain.xml.j2").render(d=spec, m=spec.metadata)


def render_template(template: str, **values) -> str:
    """Render another template of this package (the network) with ``values``."""
    return _env().get_template(template).render(**values)
