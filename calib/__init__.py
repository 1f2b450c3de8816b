"""Teacher and student models, quantizers, calibration inputs and quantizer learning."""
