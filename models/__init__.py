"""Plankton Lens models: hierarchical classifiers behind one interface, checkpoints, zoo."""
