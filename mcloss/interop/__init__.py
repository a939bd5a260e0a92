"""Interoperability: models from other projects in, maps out to Captum and Quantus."""
