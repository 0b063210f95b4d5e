"""Training code run by the trainer's subprocess (TensorFlow; see :mod:`..trainer`).

The scripts here import only numpy, TensorFlow and :mod:`edgeos_protocol` (the feature and
manifest code the gateway runs), never ``edgeos_cloud``: they run in the training environment
(``.venv-train``, where TensorFlow lives apart from LiteRT and MLflow).
"""
