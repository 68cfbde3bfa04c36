"""The paper's study on top of the general evaluation: 10-fold cross-validation of the LV Dice and the apex
error in the layout of its Table 2 (``crossval``), the comparison with plain nnU-Net on the same folds
(``compare``) and ``report.md`` (``report``). The LV label and the apex are defaults, not limits: further
labels and landmarks can be reported beside them.
"""

PAPER = {"dice": 0.909, "error_mm": 11.28,
         "source": "paper: MONAI U-Net, 10-fold CV on 20 MM-WHS CT, 1000 epochs (Dice 0.909, apex 11.28 mm)"}
