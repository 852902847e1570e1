"""Which parameters weight decay applies to, by a rule every module follows rather than a list of classes.

The rule is timm's (``timm.optim.param_groups_weight_decay``), applied to every submodule: a parameter with two or
more dimensions (the weight of a linear map, a convolution, an expert bank's ``w1``/``w2``, a router's projection)
decays; one with fewer (biases, norms, temperatures, alpha) does not; and any module may exempt its own parameters by
a ``no_weight_decay()`` method returning their names (timm's convention; timm's ``VisionTransformer`` names its
position embedding and class token). A new router or expert bank therefore decays its matrices without being
registered anywhere, and says so if one of them must not decay: an orthonormal basis (decay would pull it off the
Stiefel manifold every step), per-expert biases and scales stored as ``(E, H)`` tables.
"""

from __future__ import annotations

from torch import nn


def declared_no_weight_decay(model: nn.Module) -> set[str]:
    """The qualified names of the parameters the model's modules exempt with ``no_weight_decay()``."""
    names: set[str] = set()
    own = dict(model.named_parameters())
    for module_name, module in model.named_modules():
        declare = getattr(module, "no_weight_decay", None)
        if not callable(declare):
            continue
        prefix = f"{module_name}." if module_name else ""
        for name in declare():
            if prefix + name in own:  # timm names tokens a model may not have (dist_token)
                names.add(prefix + name)
    return names


def decayed_parameter_names(model: nn.Module) -> set[str]:
    """Names of the trainable parameters weight decay applies to: two or more dimensions, not exempted by their
    module's ``no_weight_decay()``."""
    exempt = declared_no_weight_decay(model)
    return {name for name, p in model.named_parameters() if p.requires_grad and p.ndim >= 2 and name not in exempt}
