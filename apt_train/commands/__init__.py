"""The user's commands. Each is a console script (``pyproject.toml``) and, for a checkout, a
three-line ``tools/<module>.py`` that runs the same ``main``:

========================  ===================  ==================================================
console script            module               what it does
========================  ===================  ==================================================
``apt-train``             `train`              fine-tune a timm ViT as an APT (the main job)
``apt-eval``              `evaluate`           APT and the paper's baselines on the same images
``apt-make-shards``       `make_shards`        webdataset shards + Parquet index from images
``apt-index-shards``      `index_shards`       index existing webdataset tars in place
``apt-visualize``         `visualize`          patch layouts drawn over images
``apt-calibrate``         `calibrate`          thresholds for a target token fraction
``apt-sweep``             `sweep`              the speed-accuracy curve over thresholds
========================  ===================  ==================================================

Every ``main(argv=None) -> int`` goes through `common.run_command`: wrong flags print usage, any
other error one ``<command>: error: ...`` line, both with status 2.
"""
#: console script -> module of this package (pyproject.toml's [project.scripts] lists the same)
COMMANDS = {
    "apt-train": "train",
    "apt-eval": "evaluate",
    "apt-make-shards": "make_shards",
    "apt-index-shards": "index_shards",
    "apt-visualize": "visualize",
    "apt-calibrate": "calibrate",
    "apt-sweep": "sweep",
}
