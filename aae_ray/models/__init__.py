"""Pure nn.Modules, one family a file. They never import Ray, the CLI or the workspace.

FAMILIES maps the config's `family` to its model class; every class follows aae_ray.models.base's contract.
"""

from aae_ray.models.aae import AdversarialAutoencoder
from aae_ray.models.ae import Autoencoder
from aae_ray.models.anogan import AnoGAN
from aae_ray.models.base import FamilyModel
from aae_ray.models.deepsad import DeepSAD
from aae_ray.models.egbad import EGBAD
from aae_ray.models.patch import PatchGaussian
from aae_ray.models.vae import VariationalAutoencoder

FAMILIES: dict[str, type[FamilyModel]] = {
    "aae": AdversarialAutoencoder,
    "patch": PatchGaussian,
    "ae": Autoencoder,
    "vae": VariationalAutoencoder,
    "deepsad": DeepSAD,
    "egbad": EGBAD,
    "anogan": AnoGAN,
}

__all__ = ["EGBAD", "FAMILIES", "AdversarialAutoencoder", "AnoGAN", "Autoencoder", "DeepSAD", "FamilyModel",
           "PatchGaussian", "VariationalAutoencoder"]
