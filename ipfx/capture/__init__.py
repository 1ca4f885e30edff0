"""Capture: a model as graphs whose weights are ``get_attr -> kernel`` chains, checked against the model.

Owns the two front ends (:mod:`.export`: torch.export in both training modes; :mod:`.tracing` and
:mod:`.partial`: torch.fx symbolic tracing, whole or in parts), the mode switch (:mod:`.modes`), what
keeps a graph honest on other inputs (:mod:`.guards`: call patterns and fallbacks; :mod:`.shape_guards`
and :mod:`.shapes`: sizes; :mod:`.first_call`: graphs traced without example inputs), and the capture
check (:mod:`.pipeline`: ``capture`` and its ``Captured`` result, :mod:`.verify`).

May import: torch, :mod:`ipfx.errors`, :mod:`ipfx.inputs`, :mod:`ipfx.config`, :mod:`ipfx.form`.
"""
