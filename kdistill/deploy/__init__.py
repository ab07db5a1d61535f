"""Ship the student: export (ONNX / TorchScript, parity-checked, with a model card),
predict from the command line, serve over HTTP.

Input convention shared by every exported graph, ``predict`` and ``serve``: float32 NCHW RGB
images in [0, 1], resized and centre-cropped to the model's ``image_size`` exactly as in
evaluation, *not* normalised (mean/std are applied inside the graph); dynamic batch;
output logits. See :mod:`kdistill.deploy.runtime`.

Modules: ``runtime`` (load any model kind, image preparation), ``export`` (+ parity),
``card`` (model card), ``predict``, ``serve`` (+ ``batching``, ``metrics``), ``cli``.
"""

FORMATS = ("onnx", "torchscript")
DEFAULT_TOLERANCE = 1e-4  # max |probability difference| between eager torch and the export
DEFAULT_OPSET = 17
