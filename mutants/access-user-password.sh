#!/bin/sh
# mutant: a deploy user with a usable password hash set at build time
# breaks: no open access
set -eu
useradd -m -s /bin/bash deploy
# SHA-512 crypt of "deploy" (openssl passwd -6): anyone who reads this script can log in
usermod -p '$6$kgmutant$rkc6wm6f53Vfa9Rj8K3EFQITOsXssgLBwgYAKUI2PlKPbOp1zJ6NP1jK0zuX3ZXgibFdwocE37JhjuQ.c7BxU1' deploy
