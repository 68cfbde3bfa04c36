"""The landmark position prior, in one room: where a landmark sits in the frame of a segmented structure (``model``),
fitted from a fold's training cases (``fitting``), kept in the model's plans.json per fold (``storage``), fitted for
models trained before priors existed (``cli``: ``nnUNetv2_landmark_fit_prior``). Prediction combines it with the
heatmap (``landmark_export``), and ``credibility`` judges the result with what it recorded."""
