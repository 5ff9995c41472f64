"""The app that ``pgleak demo`` runs: a tiny shop backend with three planted bugs.

It lives outside the ``pgleak`` package on purpose: pgleak hides its own frames from stacks,
and the point of the demo is to see a report name *this* code's lines.
"""
