"""``kdistill report``: one self-contained HTML page that shows whether a student is good
enough to ship: accuracy, cost and latency, agreement with and calibration against the
teacher, training curves, per-class accuracy, confusion matrices, the images the models
disagree on, and provenance.

Modules: ``gather`` (what the run folders say), ``measure`` (probabilities, cached per
checkpoint; metrics, calibration, cost), ``charts`` (matplotlib, inline SVG), ``page``
(Jinja2, ``templates/report.html.j2``), ``build`` (the command's order of work), ``cli``
(the parser), ``browser`` (headless Chromium: check a report, take a screenshot).
"""
