"""Train a character-level language model: `python train.py [key=value ...]` or `-m` for a sweep."""

import sys

import hydra

import charlm.train
from charlm import config, resolvers
from charlm.errors import exit_on_error

resolvers.register()  # ${charlm.*:...} in conf/hydra/


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg):
    return charlm.train.main(cfg)


if __name__ == "__main__":
    with exit_on_error():
        config.check_moved(sys.argv[1:])
    main()
