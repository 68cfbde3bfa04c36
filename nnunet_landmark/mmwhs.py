"""The MM-WHS CT vocabulary, in one place: the label values of its seven structures and the landmarks they define
(the converter, the phantoms and the demo all speak it)."""
from collections import OrderedDict

# label value of each structure in the MM-WHS CT release (the LV blood cavity first: it becomes label 1)
STRUCTURES = OrderedDict([
    ("LV_blood_cavity", 500), ("LV_myocardium", 205), ("LA", 420), ("RA", 550), ("RV", 600),
    ("ascending_aorta", 820), ("pulmonary_artery", 850),
])
STRUCTURE_NAMES = {value: name for name, value in STRUCTURES.items()}
LV_CAVITY, LV_MYOCARDIUM, LEFT_ATRIUM, RIGHT_ATRIUM = 500, 205, 420, 550
RIGHT_VENTRICLE, ASCENDING_AORTA, PULMONARY_ARTERY = 600, 820, 850
# the paper's alignment landmarks, in heatmap channel order
LANDMARKS = ("apex", "mitral_valve", "aortic_valve")
