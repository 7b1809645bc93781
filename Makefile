# All targets set up what they need on a fresh machine (tools/setup_env.sh is idempotent).
PY := .venv/bin/python

.PHONY: setup test demo bench bench-train bench-attack bench-scaling bench-memory bench-all thumbnails lab-data lab-retrain clean
setup:
	bash tools/setup_env.sh

test: setup
	$(PY) -m pytest -q

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
	$(PY) -m tools.make_template_thumbnails --work .cache/pictures
	$(PY) -m tools.make_doc_images --work .cache/pictures  # reuses the LoRD and AUROC the first step measured

clean:
	rm -rf demo_output .pytest_cache
