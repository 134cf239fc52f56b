"""MkDocs hook: the docstrings mark cross-references in Sphinx style (:func:`name`); mkdocstrings
renders the name as code and would leave the role in front of it as text. Drop the role."""

import re

_ROLE = re.compile(r":(?:py:)?(?:func|meth|class|mod|attr|data|obj|exc|const):(?=<code>)")


def on_page_content(html, page, config, files):
    return _ROLE.sub("", html)
