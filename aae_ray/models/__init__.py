"""Pure nn.Modules, one family a file. They never import Ray, the CLI or the workspace."""

from aae_ray.models.aae import AdversarialAutoencoder
from aae_ray.models.ae import Autoencoder

__all__ = ["AdversarialAutoencoder", "Autoencoder"]
