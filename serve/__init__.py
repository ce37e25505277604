"""The Ray Serve shell over aae_ray.serving (see app.py)."""
