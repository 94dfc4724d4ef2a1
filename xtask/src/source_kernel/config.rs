//! The project's config fragment and the check that the final `.config` has every option it
//! asks for: `make olddefconfig` silently drops a value whose dependencies are not met.
use std::collections::BTreeMap;

use anyhow::bail;

/// One option the fragment sets: `CONFIG_X=VALUE`, or `# CONFIG_X is not set` (value `None`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Setting {
    pub name: String,
    pub value: Option<String>,
}

impl Setting {
    fn describe(&self) -> String {
        match &self.value {
            Some(value) => format!("{}={value}", self.name),
            None => format!("{} off", self.name),
        }
    }
}

/// The settings of a fragment (or of a whole `.config`), in order. Other comments and blank
/// lines are skipped; anything else is an error naming the line, so that a typo in the
/// fragment is not silently ignored by the kernel's config tools.
pub fn parse(text: &str) -> anyhow::Result<Vec<Setting>> {
    let mut settings = Vec::new();
    for (number, line) in text.lines().enumerate() {
        let line = line.trim();
        if let Some(rest) = line.strip_prefix("# CONFIG_")
            && let Some(name) = rest.strip_suffix(" is not set")
        {
            settings.push(Setting { name: format!("CONFIG_{name}"), value: None });
        } else if line.is_empty() || line.starts_with('#') {
            continue;
        } else if let Some((name, value)) = line.split_once('=')
            && name.starts_with("CONFIG_")
            && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
        {
            settings.push(Setting { name: name.to_owned(), value: Some(value.to_owned()) });
        } else {
            bail!("line {}: {line:?} is neither CONFIG_X=VALUE, `# CONFIG_X is not set` nor a comment", number + 1);
        }
    }
    Ok(settings)
}

/// The settings of `wanted` that the final `config` does not have, each with what it has
/// instead. An option absent from `config` counts as off (kconfig leaves out options whose
/// menu is off).
pub fn missing(wanted: &[Setting], config: &str) -> anyhow::Result<Vec<String>> {
    let have: BTreeMap<String, Option<String>> = parse(config)?.into_iter().map(|s| (s.name, s.value)).collect();
    let mut missing = Vec::new();
    for setting in wanted {
        let found = have.get(&setting.name).cloned().flatten();
        let off = |value: &Option<String>| value.as_deref().is_none_or(|v| v == "n");
        let ok = match &setting.value {
            None => off(&found),
            Some(_) if off(&setting.value) => off(&found),
            Some(value) => found.as_deref() == Some(value.as_str()),
        };
        if !ok {
            let instead = match found {
                Some(value) => format!("{}={value}", setting.name),
                None => format!("{} off", setting.name),
            };
            missing.push(format!("{} (the .config has {instead})", setting.describe()));
        }
    }
    Ok(missing)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fragment_parses_into_settings_and_refuses_typos() {
        let fragment = "# why\nCONFIG_CXL_BUS=m\n\n# CONFIG_DRM is not set\nCONFIG_LOCALVERSION=\"-tracer\"\n";
        assert_eq!(
            parse(fragment).unwrap(),
            [
                Setting { name: "CONFIG_CXL_BUS".into(), value: Some("m".into()) },
                Setting { name: "CONFIG_DRM".into(), value: None },
                Setting { name: "CONFIG_LOCALVERSION".into(), value: Some("\"-tracer\"".into()) },
            ]
        );
        // Symbols may have lower case (CONFIG_FONT_8x16), but not the prefix.
        assert_eq!(parse("CONFIG_FONT_8x16=y\n").unwrap()[0].name, "CONFIG_FONT_8x16");
        let err = parse("CONFIG_CXL_BUS=m\nCXL_PCI=m\n").unwrap_err().to_string();
        assert!(err.contains("line 2") && err.contains("CXL_PCI=m"), "{err}");
        assert!(parse("config_cxl_bus=m\n").is_err());
    }

    #[test]
    fn the_check_names_each_dropped_or_changed_option() {
        let wanted = parse(
            "CONFIG_CXL_BUS=m\nCONFIG_CXL_REGION_INVALIDATION_TEST=y\nCONFIG_DEV_DAX_HMEM=m\n\
             # CONFIG_DRM is not set\n# CONFIG_CFG80211 is not set\n",
        )
        .unwrap();
        // What olddefconfig makes when EFI_SOFT_RESERVE is missing and something selects DRM;
        // CFG80211 is absent altogether (its menu is off), which counts as off.
        let config = "CONFIG_CXL_BUS=m\n# CONFIG_CXL_REGION_INVALIDATION_TEST is not set\nCONFIG_DRM=y\n";
        assert_eq!(
            missing(&wanted, config).unwrap(),
            [
                "CONFIG_CXL_REGION_INVALIDATION_TEST=y (the .config has CONFIG_CXL_REGION_INVALIDATION_TEST off)",
                "CONFIG_DEV_DAX_HMEM=m (the .config has CONFIG_DEV_DAX_HMEM off)",
                "CONFIG_DRM off (the .config has CONFIG_DRM=y)",
            ]
        );
        let good = "CONFIG_CXL_BUS=m\nCONFIG_CXL_REGION_INVALIDATION_TEST=y\nCONFIG_DEV_DAX_HMEM=m\n";
        assert_eq!(missing(&wanted, good).unwrap(), Vec::<String>::new());
        // A module where a built-in was asked for is a miss too: cxl_test needs =m, not =y.
        assert_eq!(missing(&parse("CONFIG_CXL_BUS=m\n").unwrap(), "CONFIG_CXL_BUS=y\n").unwrap().len(), 1);
    }

    #[test]
    fn the_shipped_fragment_parses_and_asks_for_the_cxl_core_as_a_module() {
        let settings = parse(super::super::SOURCE_KERNELS[0].fragment).unwrap();
        let value = |name: &str| settings.iter().find(|s| s.name == name).map(|s| s.value.clone());
        assert_eq!(value("CONFIG_CXL_BUS"), Some(Some("m".into())));
        assert_eq!(value("CONFIG_CXL_REGION_INVALIDATION_TEST"), Some(Some("y".into())));
        assert_eq!(value("CONFIG_DEBUG_INFO_BTF_MODULES"), Some(Some("y".into())));
        assert_eq!(value("CONFIG_DRM"), Some(None));
    }
}
