//! `corral models list` and `corral models pull`.

use crate::config::Config;
use crate::slm::models;

pub fn list(config: &Config) -> crate::Result<i32> {
    for m in config.slm.models.iter() {
        let path = models::model_path(&config.slm.model_dir, m);
        let state = if path.is_file() { "present" } else { "absent" };
        let arch = m.architecture.as_deref().unwrap_or("?");
        let quant = m.quantization.as_deref().unwrap_or("?");
        println!(
            "{:<28} {:<8} {:<8} {:<24} {}  ({})",
            m.id,
            state,
            arch,
            quant,
            path.display(),
            m.name
        );
    }
    Ok(0)
}

pub fn pull(config: &Config, id: &str) -> crate::Result<i32> {
    let m =
        models::lookup(&config.slm.models, id).map_err(|e| crate::Error::Usage(e.to_string()))?;
    let path = models::pull(&config.slm.model_dir, m, true)
        .map_err(|e| crate::Error::Usage(e.to_string()))?;
    println!("{}", path.display());
    Ok(0)
}
