"""nnU-Net v2 plugin that detects anatomical landmarks while it segments.

Kept import-light on purpose: ``nnunet_landmark._startup`` runs at every interpreter start (through
``nnunet_landmark.pth``) and must not pull in torch or nnU-Net.
"""
__version__ = "0.1.0"

# nnU-Net version the integration module was checked against (see nnunet_landmark/nnunet_integration.py)
NNUNET_VERSION_CHECKED = "2.8.1"
