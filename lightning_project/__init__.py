"""Fine-tune pretrained torchvision image classifiers with PyTorch Lightning, configured by Hydra."""

__version__ = "0.1.0"


def _launch_dir() -> str:
    """Hydra's runtime.cwd once its config is set (a run, a launcher's job); before that (a sweeper reading
    hydra.sweep.dir, which ${hydra:runtime.cwd} cannot resolve yet) the process's working directory, the same one."""
    import os

    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.get().runtime.cwd if HydraConfig.initialized() else os.getcwd()


def _register_resolvers() -> None:
    """${cwd:} (paths.root_dir): the directory the command was run from. Registered on import, so launcher
    workers that unpickle the task have it too."""
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("cwd"):
        OmegaConf.register_new_resolver("cwd", _launch_dir)


_register_resolvers()
