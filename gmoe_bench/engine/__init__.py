"""Engine: training and evaluation loops."""
