"""The one memory model of a run's model states (:mod:`.breakdown`), used by validation's fit
check and by ``launch/memory.py`` (:mod:`.report`)."""
