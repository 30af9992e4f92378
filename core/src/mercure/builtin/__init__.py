"""Plugins that ship with the core: the DICOM receiver, folder and dummy targets, log sinks."""
