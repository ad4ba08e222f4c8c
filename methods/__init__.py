"""The methods' maths as plain functions on ComfyUI objects; node classes in ``nodes/`` call these."""
