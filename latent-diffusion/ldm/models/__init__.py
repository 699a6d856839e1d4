"""Models addressed by CompVis configs' `model.target`."""
