# All targets set up what they need on a fresh machine (tools/setup_env.sh is idempotent).
PY := .venv/bin/python

.PHONY: setup test demo bench bench-train bench-attack bench-scaling bench-memory bench-all thumbnails lab-data lab-retrain lab2-data lab2-retrain lab2-pilot clean
setup:
	bash tools/setup_env.sh

# on every core (at most 4 workers), whole files per worker, the longest files first (tests/conftest.py)
test: setup
	$(PY) -m pytest -q -n auto --maxprocesses 4 --dist loadfile --no-loadscope-reorder

demo: setup
	$(PY) -m lab.demo --out demo_output

# Retraining the lab model (hours on 2 CPU cores; lab/MODEL_CARD.md): needs the full Fashion-MNIST
lab-data:
	@test -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz || \
	  { echo "[lab] installing Debian's dataset-fashion-mnist"; apt-get install -y -q dataset-fashion-mnist; }

lab-retrain: setup lab-data
	$(PY) -m lab.train_vae --out .cache/lab/vae --steps 3000 --stop-after 1700
	$(PY) -m lab.train_classifier --out .cache/lab/lab_classifier.safetensors --epochs 4
	$(PY) -m lab.train_unet --vae .cache/lab/vae/vae_final.pt --out .cache/lab/unet --steps 1400 --lr 3e-4
	$(PY) -m lab.ship pack --vae .cache/lab/vae/vae_final.pt --unet .cache/lab/unet/checkpoint.pt \
	  --out lab/weights/lab_fashion_parts.safetensors
	cp .cache/lab/lab_classifier.safetensors lab/weights/lab_classifier.safetensors
	$(PY) -m lab.data

# Lab model 2 (64 px textures; lab/MODEL_CARD_2.md): Debian's ufoai-textures (336 MB), then the VAE,
# the classifier, the UNet (hours on 2 CPU cores; every step resumable: rerun the same target)
lab2-data:
	@test -f /usr/share/games/ufoai/base/0textures.pk3 || \
	  { echo "[lab2] installing Debian's ufoai-textures"; apt-get install -y -q ufoai-textures; }

lab2-retrain: setup lab2-data
	$(PY) -m lab.train_vae --data textures --out .cache/lab2/vae --batch-size 8 --steps 1500
	$(PY) -m lab.train_vae --data textures --out .cache/lab2/vae --batch-size 8 --steps 6000  # continued (MODEL_CARD_2)
	$(PY) -m lab.ship weights --checkpoint .cache/lab2/vae/vae_final.pt --out lab/weights/lab_textures_vae.safetensors
	$(PY) -m lab.eval_vae --vae lab/weights/lab_textures_vae.safetensors --out docs/lab2/vae_eval
	$(PY) -m lab.train_classifier --data textures --out .cache/lab2/lab_textures_classifier_rec.safetensors --steps 2000 \
	  --batch-size 64 --vae lab/weights/lab_textures_vae.safetensors --reconstructed 0.5 --jitter 0.2
	$(PY) -m lab.train_unet --data textures --vae lab/weights/lab_textures_vae.safetensors --out .cache/lab2/unet --steps 3000 --lr 3e-4
	$(PY) -m lab.ship pack --vae lab/weights/lab_textures_vae.safetensors --unet .cache/lab2/unet/checkpoint.pt \
	  --description "lab model 2 (ufoai textures, 64 px)" --out lab/weights/lab_textures_parts.safetensors
	cp .cache/lab2/lab_textures_classifier_rec.safetensors lab/weights/lab_textures_classifier.safetensors

# the latent pilot (docs/lab2/pilot; lab/MODEL_CARD_2.md): the VAE as trained so far and a short UNet run
# (the ACE / mist-v2 / ASPL objectives need one; EMA 0.98 so that 300 steps are not the initial weights)
lab2-pilot: setup lab2-data
	$(PY) -m lab.train_unet --data textures --vae .cache/lab2/vae/checkpoint.pt --out .cache/lab2/unet_pilot \
	  --crops 4000 --steps 300 --batch-size 16 --ema 0.98 --lr 3e-4 --checkpoint-every 50
	$(PY) -m lab.ship pack --vae .cache/lab2/vae/checkpoint.pt --unet .cache/lab2/unet_pilot/checkpoint.pt \
	  --description "lab model 2 (ufoai textures, 64 px), pilot" --out .cache/lab2/pilot_parts.safetensors
	$(PY) -m lab.ship unpack --parts .cache/lab2/pilot_parts.safetensors --out .cache/lab2/pilot_checkpoint.safetensors
	$(PY) -m lab.pilot_textures --checkpoint .cache/lab2/pilot_checkpoint.safetensors --out docs/lab2/pilot

# Benchmarks (BENCHMARKS.md): each target runs one script with its defaults and rewrites that script's
# section of BENCHMARKS.md, whose "Command:" line names the target. Estimated times on 2 CPU cores.
bench: setup                # sampling cost per step, LoRD vs stock LoRA (~11 min)
	$(PY) -m bench.bench_sampling

bench-train: setup          # Stage-1 training cost vs core Train LoRA (~24 min)
	$(PY) -m bench.bench_train

bench-attack: setup         # LoRD Protect attack cost incl. the mist-v2 preset (~20 min)
	$(PY) -m bench.bench_attack

bench-scaling: setup        # overhead vs resolution and batch size + docs/bench/scaling.png (~12 min)
	$(PY) -m bench.bench_scaling

bench-memory: setup         # the memory check's estimate vs measured peaks (~5 min)
	$(PY) -m bench.bench_memory

bench-all: setup            # all four in sequence, each rewriting its own section (~70 min)
	$(MAKE) --no-print-directory bench
	$(MAKE) --no-print-directory bench-train
	$(MAKE) --no-print-directory bench-attack
	$(MAKE) --no-print-directory bench-scaling

thumbnails: setup           # template thumbnails, docs/examples/ and the help pages' pictures, on the lab model
	$(PY) -m lab.make_template_thumbnails --work .cache/pictures
	$(PY) -m lab.make_doc_images --work .cache/pictures  # reuses the LoRD and AUROC the first step measured

clean:
	rm -rf demo_output .pytest_cache
