"""Shared infrastructure: devices, NVML, out-of-memory detection, images, validation rules, journals."""
