"""The basic modules: the config and its presets, hardware, models, data files and datasets, preference data, the
recipe, estimates, metrics and the run folder's names, paths, access and storage rules. They import nothing of
the project above this folder (not the stages, not the services), so the training child and the app share them."""
