"""Design: placement + image + VM identity -> a frozen DomainSpec -> libvirt domain XML."""

from .designer import FabricNic, VmInputs, design, image_cache_tag, mac_for, share_tag
from .fit import RealHost, fit_to_host
from .domain_xml import domain_xml
from .spec import DomainSpec

__all__ = ["FabricNic", "VmInputs", "design", "mac_for", "share_tag", "image_cache_tag", "RealHost",
           "fit_to_host", "domain_xml", "DomainSpec"]
