"""Images in and out: reading files (:mod:`.io`), datasets (:mod:`.datasets`), and
generated panoramic phantoms with known regions (:mod:`.phantoms`)."""
