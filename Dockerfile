# GPU image for iterppo-lightning: CUDA PyTorch + DeepSpeed.
# (Not built in CI: the CI machine has no GPU and no registry access.)
FROM nvidia/cuda:12.4.1-cudnn-devel-ubuntu22.04

ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1
RUN apt-get update && apt-get install -y --no-install-recommends \
        python3 python3-pip python3-venv git build-essential \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/iterppo
COPY pyproject.toml README.md ./
COPY iterppo_lightning ./iterppo_lightning
COPY callbacks ./callbacks
COPY configs ./configs

# CUDA build of torch (the CPU pin in pyproject is for the 2-core CI machine;
# here we install the matching CUDA wheel first, then the package without
# letting pip swap torch back).
RUN python3 -m pip install --upgrade pip \
    && python3 -m pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cu124 \
    && python3 -m pip install . \
    && python3 -c "import deepspeed, torch; print('deepspeed', deepspeed.__version__, 'cuda', torch.version.cuda)"

ENTRYPOINT ["iterppo"]
CMD ["--help"]
