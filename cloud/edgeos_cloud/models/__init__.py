"""The model lifecycle in the cloud: every model versioned, gated and retrained from fleet data.

=================  =============================================================================
``registry``       MLflow tracking + model registry: versions, artifacts, stages, audit, tracking
``gate``           the automatic quality gate (integrity, golden on LiteRT, finite, budget,
                   accuracy against the champion on held-out fleet rows, per task's metric)
``litert``         the cloud's LiteRT invocation (the interpreter library the gateways run)
``replay``         quality, anomaly and correction rows from the receiver database, with the
                   gateway's own feature code (:mod:`edgeos_protocol.features`)
``trainer``        spawns the TensorFlow trainer (:mod:`.train`) in its own environment
``publish``        qualified version → models bundle → TUF repository → staged campaign
``tracking``       the gateways' model reports folded per version × group (incremental)
``campaigns``      the OTA campaigns' device reports → per-device install audit, halted marks
``state``          the incremental readers' cursors (``home/state/``)
``lifecycle``      the operations (``Lifecycle``) and the configuration (``models.toml``)
``metrics``        Prometheus gauges of every version per group (docs/grafana/)
``cli``            ``edgeos-cloud models …``
=================  =============================================================================

See ``docs/model-lifecycle.md``. Needs the ``models`` extra (MLflow, LiteRT); TensorFlow only in
the trainer's environment.
"""
