"""Fine-tune pretrained torchvision image classifiers with PyTorch Lightning, configured by Hydra."""

__version__ = "0.1.0"


def _register_resolvers() -> None:
    """${cwd:}: the launch directory, resolvable before Hydra sets its HydraConfig (a sweeper reads hydra.sweep.dir
    then) and in launcher workers, which import this package when they unpickle the task."""
    import os

    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("cwd"):
        OmegaConf.register_new_resolver("cwd", os.getcwd)


_register_resolvers()
