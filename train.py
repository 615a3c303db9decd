"""Train a character-level LSTM language model: `python train.py [key=value ...]` or `-m` for a sweep."""

import hydra

import charlm.train
from charlm import resolvers

resolvers.register()  # ${charlm.*:...} in conf/hydra/


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg):
    return charlm.train.main(cfg)


if __name__ == "__main__":
    main()
