# raykit's image: the official Ray image of the exact Ray version pyproject.toml pins, plus raykit.
#
#   make image                                                   # CUDA (GPU nodes): rayproject/ray:<ver>-py311-gpu
#   make image IMAGE_FLAVOR=cpu                                  # CPU nodes: the -cpu tag, torch from its CPU index
#   docker build --build-arg RAY_TAG=2.60.0-py311-cpu \
#       --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cpu -t raykit:cpu .
#
# Every node of a Ray cluster must run the same Ray and Python: the tag's version is checked against
# pyproject's pin in the smoke step below, and tests/test_packaging.py checks the default tag too.
ARG RAY_TAG=2.60.0-py311-gpu
FROM rayproject/ray:${RAY_TAG}

# Empty: torch==2.13.0 from PyPI, which is the CUDA build. The CPU image sets PyTorch's CPU index
# (an extra index: its 2.13.0+cpu wins over PyPI's 2.13.0 for the same pin).
ARG TORCH_INDEX=""

# DS_BUILD_OPS=0: DeepSpeed installs without compiling its ops; CPU-Adam JIT-builds on the node that
#   first needs it, into TORCH_EXTENSIONS_DIR, which must be writable by uid 1000 (/tmp is an emptyDir
#   in k8s/).
# HF_HOME: the hub cache of the models the jobs download, writable, and a volume if you mount one.
ENV DS_BUILD_OPS=0 \
    TORCH_EXTENSIONS_DIR=/tmp/torch_extensions \
    HF_HOME=/home/ray/.cache/huggingface \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1

WORKDIR /home/ray/raykit

# The dependency layer first (it changes only with pyproject.toml): pyproject's pins, raykit itself
# left for the next layer so that a code change does not reinstall torch.
COPY --chown=1000:100 pyproject.toml README.md ./
RUN python -c "import tomllib; d = tomllib.load(open('pyproject.toml', 'rb')); print('\n'.join(d['project']['dependencies']))" > /tmp/requirements.txt \
 && pip install --no-cache-dir ${TORCH_INDEX:+--extra-index-url "$TORCH_INDEX"} --requirement /tmp/requirements.txt \
 && rm /tmp/requirements.txt

# raykit, with jobs/ and tune_spaces/ as package data and beside it in the working directory, where
# the jobs' relative paths (data/quickstart) resolve.
COPY --chown=1000:100 raykit ./raykit
COPY --chown=1000:100 jobs ./jobs
COPY --chown=1000:100 tune_spaces ./tune_spaces
COPY --chown=1000:100 data/quickstart ./data/quickstart
RUN pip install --no-cache-dir --no-deps . \
 && python -c "import importlib.metadata as m, deepspeed, peft, ray, torch, raykit; \
pin = next(r for r in m.requires('raykit-embed') if r.startswith('ray[')).split('==')[1]; \
assert ray.__version__ == pin, f'image Ray {ray.__version__} != pyproject pin {pin}: set RAY_TAG to {pin}'; \
import importlib.resources as r; assert r.files('raykit.jobs').joinpath('quickstart.yaml').is_file(), 'jobs not packaged'; \
print('raykit', raykit.__version__, '| ray', ray.__version__, '| torch', torch.__version__, '| peft', peft.__version__, '| deepspeed', deepspeed.__version__)"

# The Ray image's own non-root user (uid 1000, group users); k8s/ runs it with runAsNonRoot.
USER 1000
