"""Ray job: GeoLink urban-village fine-tuning (same code as `geolink-engine finetune`).

    ray job submit --working-dir . -- python jobs/finetune.py --workspace /shared/geolink-data --init-from /shared/geolink-data/models/pretrain --gpu
"""

from train_args import run

if __name__ == "__main__":
    run("finetune", __doc__.splitlines()[0])
